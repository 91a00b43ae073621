"""tmanet.calibration"""
