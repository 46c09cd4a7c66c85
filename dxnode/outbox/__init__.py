"""Stage 6, outbox: written outputs delivered to each destination (C-STORE or STOW-RS), with retries."""
