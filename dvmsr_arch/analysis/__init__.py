"""Tools that explain what a trained network does."""
