"""Applications built with `aidial-sdk`, run as Tollgate upstreams by the tests."""
