"""The trainctl training worker (torch + timm). Importing this package is cheap: torch loads lazily."""
