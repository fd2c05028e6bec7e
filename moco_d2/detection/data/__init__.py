"""Pascal VOC data for the detection transfer: validating loader, tree checks, synthetic trees."""
