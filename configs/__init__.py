"""The shipped run recipes: ``surgery-edge run paper_vit_b32`` finds ``paper_vit_b32.yaml`` here."""
