// infer tests
