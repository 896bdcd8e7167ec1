"""Plain helpers the apps share: no models, no imports from the apps."""
