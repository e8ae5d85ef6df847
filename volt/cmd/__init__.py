"""Console scripts of Volt."""
