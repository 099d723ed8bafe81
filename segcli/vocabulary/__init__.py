"""The label vocabulary: label sets, synonyms, named sets and prompt templates."""
