"""tmanet.runtime"""
