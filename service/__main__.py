from service.cli import serve

serve()
