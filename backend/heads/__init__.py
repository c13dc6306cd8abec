"""Head-level analyses: induction heads (long vs short prefix) and head polysemanticity, with their queries."""
