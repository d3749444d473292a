"""What operators use: the compensate command and Flower."""
