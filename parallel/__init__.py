"""megalora.parallel"""
