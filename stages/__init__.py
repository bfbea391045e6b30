"""One module per stage; each reads like its paper's method section and knows nothing about Ray."""
