"""Plain task functions (async or sync). No engine imports here, ever."""
