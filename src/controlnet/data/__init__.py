"""Paired training data: dataset layouts, paired transforms, aspect buckets, latent and text caches."""
