"""kvlib.tasks"""
