"""Small reusable layers that timm does not provide (e.g. mask-aware GRN)."""
