"""facedist.benchmarks"""
