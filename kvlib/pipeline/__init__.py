"""kvlib.pipeline"""
