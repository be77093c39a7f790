"""kvlib.engine"""
