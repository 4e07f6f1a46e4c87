"""sde package."""
