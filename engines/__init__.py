"""tmanet.engines"""
