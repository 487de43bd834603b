"""Models shipped with edgeembed; installed as the package edgeembed._models."""
