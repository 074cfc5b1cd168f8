"""fdcrapp: a Flower Message-API app defended by FDCR."""
