from django.urls import path

from gateway import views

urlpatterns = [
    path("chat/completions", views.chat_completions, name="chat-completions"),
    path("embeddings", views.embeddings, name="embeddings"),
    path("responses", views.responses, name="responses"),
    path("responses/<str:response_id>", views.response_detail, name="response-detail"),
    path("responses/<str:response_id>/cancel", views.response_cancel, name="response-cancel"),
    path("models", views.models, name="models"),
]
