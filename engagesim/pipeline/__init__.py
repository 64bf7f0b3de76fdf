"""Jobs that wire stages together; each stage is (config, input URIs) → output URIs."""
