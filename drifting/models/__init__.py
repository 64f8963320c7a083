"""Networks: generators, feature encoders, policies."""
