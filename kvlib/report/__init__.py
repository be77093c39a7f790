"""kvlib.report"""
