"""facedist.data"""
