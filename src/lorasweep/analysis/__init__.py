"""From finished trials to answers: optima per cell, and how they scale with rank."""
