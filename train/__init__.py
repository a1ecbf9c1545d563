"""megalora.train"""
