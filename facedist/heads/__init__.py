"""facedist.heads"""
