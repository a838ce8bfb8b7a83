"""The HTTP service: the app, routes, export responses, downloads and the middleware."""
