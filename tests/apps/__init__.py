"""Small koban apps that tests run as `koban start --app apps.<module>:app` subprocesses."""
