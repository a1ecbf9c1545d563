"""megalora.export"""
