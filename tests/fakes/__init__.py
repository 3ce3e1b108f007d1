"""In-repo fakes for tests: small real implementations, not mocks."""
