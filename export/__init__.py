"""tmanet.export"""
