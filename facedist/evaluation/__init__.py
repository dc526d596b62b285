"""facedist.evaluation"""
