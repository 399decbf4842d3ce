"""abcache-jax"""
