"""What the tests share: the numerical bounds they hold results to (``bounds``) and the
short training runs that the layout tests compare (``runs``)."""
