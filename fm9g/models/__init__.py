"""FM9G model definition: config presets, the decoder, attention backends and LoRA. Imports only torch."""
