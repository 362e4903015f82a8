"""Helpers the library and the application share: argument checks, errors, atomic files,
versioned folders and safe `.keras` loading."""
