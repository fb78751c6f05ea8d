"""Where work runs: joining or starting Ray and the resources it offers, local process pools.
Imports only config and errors."""
