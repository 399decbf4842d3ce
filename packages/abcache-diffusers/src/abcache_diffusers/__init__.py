"""abcache-diffusers"""
