"""The aggregator's web page: flame graphs of the retained exports, a JSON API and downloads."""
