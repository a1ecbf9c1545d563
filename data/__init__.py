"""megalora.data"""
