"""Long-context evaluation of KV-cache presses: needle-in-a-haystack accuracy and perplexity (tachy eval)."""
