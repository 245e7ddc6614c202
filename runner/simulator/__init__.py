"""The simulator: a loopback HTTP server that speaks Zhipu's two APIs as their documentation describes
them; the offline default and the backbone of the tests."""
