"""dmlfast: fused proxy losses, fast data loading and exact retrieval evaluation for deep metric learning."""
