"""rlrapp: a Flower legacy-API app (NumPyClient) defended by RLR."""
