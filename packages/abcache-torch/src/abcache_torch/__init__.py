"""abcache-torch"""
