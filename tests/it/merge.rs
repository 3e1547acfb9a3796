// merge tests
